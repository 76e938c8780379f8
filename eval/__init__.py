"""Evaluation of generative models: sample quality (FID / KID / IS) and likelihood (bits/dim)."""
