"""The bundled tiny world: a character tokenizer, generated code tasks, a tiny teacher."""
