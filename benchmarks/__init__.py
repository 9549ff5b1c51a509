"""Side-by-side benchmarks of DASH against the tools a user would otherwise reach for."""
