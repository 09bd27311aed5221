"""Value-group scorers, registered by name: one file, one scoring rule each (add one here to use it by name
in `Compression(scorer=...)`, `JointCompression` and eval's `*.scorer` settings)."""

from subtoken_jax.selectors.scorers.attention import QuestionAttention
from subtoken_jax.selectors.scorers.base import ValueGroupScorer, value_group_norms
from subtoken_jax.selectors.scorers.expected import ExpectedAttentionScores
from subtoken_jax.selectors.scorers.reconstruction import ReconstructionAttention, ReconstructionShares
from subtoken_jax.selectors.scorers.snapkv import PooledQuestionAttention, PooledQuestionAttentionRMS

VALUE_GROUP_SCORERS = {"attention": QuestionAttention, "snapkv": PooledQuestionAttention,
                       "snapkv_rms": PooledQuestionAttentionRMS, "expected": ExpectedAttentionScores,
                       "kvzip": ReconstructionAttention, "kvzip_shares": ReconstructionShares}
# the scorers that read KVzip's repetition pass (generate and eval run it for them)
RECONSTRUCTION_SCORERS = tuple(name for name, cls in VALUE_GROUP_SCORERS.items()
                               if issubclass(cls, ReconstructionAttention))

__all__ = ["RECONSTRUCTION_SCORERS", "VALUE_GROUP_SCORERS", "ExpectedAttentionScores", "PooledQuestionAttention",
           "PooledQuestionAttentionRMS", "QuestionAttention", "ReconstructionAttention", "ReconstructionShares",
           "ValueGroupScorer", "value_group_norms"]
