"""One file per table or report: ASR (Table 1), speech output (Table 2), spoken QA (Table 3), dialogue (Table 4), state, codec, text QA, report."""
