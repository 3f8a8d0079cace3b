"""The synthetic eSpeak NG corpus: voices, sentences, QA families, duplex turns, answer checking."""
