"""The bundled model series: a Llama-compatible transformer, its byte tokenizer, training."""
