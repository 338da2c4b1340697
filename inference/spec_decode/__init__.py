"""Speculative decoding: the `--speculative-config` settings (config.py, and
draft_check.py for a draft model), the proposers that guess the next tokens
behind one interface (proposer.py: n-gram lookup in ngram.py, suffix trees
over arctic-inference in suffix.py), the verification that keeps only what
the target model itself would have produced (verify.py), and the counters
and per-request auto-off rule (stats.py).

The scheduler (inference/scheduler.py) owns the drafts on each request and
rolls back the KV slots of rejected ones; the model runner verifies and
proposes. Nothing here mutates a request.
"""
