"""The instruments: decode speed and memory per configuration (bench.py, one fresh process per
measurement; bench_report.py writes its table), latency vs position, RAM budgets (residency.py),
roofline projections for the boards, llama.cpp as the engine beside us (against.py names the
engines; llama_cpp.py finds llama.cpp's own tools, llama_bench.py and llama_perplexity.py run them,
gguf_info.py reads a GGUF's header), and the figures of every result."""
