"""The frozen LLM: loading any Hugging Face causal LM, greedy generation, the stand-in (stage llm_text)."""
