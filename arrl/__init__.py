"""arrl (AutoResearch-RL): automated research on a GPT training script.

The library: messages and the Redis bus, the edit grammar, the policy and PPO, the
self-evaluator's forecaster, reward, termination, ledger and logging. No process management
lives here; the stages in `pipeline/` and `workers/` are thin loops around it.
"""

__version__ = "0.1.0"
