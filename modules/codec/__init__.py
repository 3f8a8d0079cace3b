"""The speech codec (stage output_1_codec): encoder, quantizer and generator; discriminators for training only."""
