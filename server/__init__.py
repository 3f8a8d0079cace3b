"""The streaming engine: sessions, VAD, the duplex state machine, the synthesis FIFO, the chat timeline."""
