"""fastft: MoCo v1/v2 + Feature Transformation, built for throughput."""
__version__ = "0.1.0"
