"""Speculative decoding: the `--speculative-config` settings (config.py), the
proposers that guess the next tokens (ngram.py) and the verification that
keeps only what the target model itself would have produced (verify.py).

The scheduler (inference/scheduler.py) owns the drafts on each request and
rolls back the KV slots of rejected ones; the model runner verifies and
proposes. Nothing here mutates a request.
"""
