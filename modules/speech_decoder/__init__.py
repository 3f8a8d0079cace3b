"""The speech decoder: pre-network, NAR prefix decoder, shared NAR/AR stack (stages output_2_decoder, output_3_prefix)."""
