"""Evaluation metrics: Q16 + NudeNet inappropriate probability, FID, CLIPScore."""
