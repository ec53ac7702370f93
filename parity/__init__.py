"""Cross-backend tools: weight conversion, benchmarks, the side-by-side reader and the parity tests."""
