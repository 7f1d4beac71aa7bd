"""Short fixed prompts shared by benchmarks/gpu_check.py and benchmarks/serve_bench.py (plain Python: the serve
benchmark's client side uses the standard library only)."""

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "Explain in three sentences why the sky is blue.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "List five fruits and one fact about each.",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]
