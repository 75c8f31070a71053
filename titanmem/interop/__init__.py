"""Formats of other tools: a titanmem model written as a Hugging Face transformers folder (`export.format = "hf"`)."""
