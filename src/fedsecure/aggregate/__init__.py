"""The aggregate layer: the fixed functions an aggregator may apply to the updates it holds."""
