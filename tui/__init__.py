"""neurotop's terminal UI. Never imports torch: it must start fast on a laptop without it."""
