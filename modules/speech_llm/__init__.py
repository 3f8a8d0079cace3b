"""Speech and prompt embeddings around the frozen LLM (stages input_2_align, input_3_prompt)."""
