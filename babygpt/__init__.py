"""babygpt core: configuration, tokenizer, token shards and FLOP accounting, shared by both backends (numpy only)."""
