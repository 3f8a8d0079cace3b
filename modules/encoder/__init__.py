"""The streaming speech encoder and its CTC head (stage input_1_ctc)."""
