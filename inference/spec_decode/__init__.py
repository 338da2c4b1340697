"""Speculative decoding: the `--speculative-config` settings (config.py, and
draft_check.py for a draft model), the proposer that guesses the next tokens
(ngram.py), the verification that keeps only what the target model itself
would have produced (verify.py), and the counters and per-request auto-off
rule (stats.py).

The scheduler (inference/scheduler.py) owns the drafts on each request and
rolls back the KV slots of rejected ones; the model runner verifies and
proposes. Nothing here mutates a request.
"""
