"""The instruments: decode speed and memory per configuration (bench.py, one fresh process per
measurement), latency vs position, RAM budgets (residency.py), roofline projections for the boards,
llama.cpp as the engine beside us (against.py), and the figures of every result."""
