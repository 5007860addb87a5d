"""Decoding S2 token sequences from a model, as in language models.

Model-agnostic (t5x style): every strategy drives a
`tokens_to_logits(prev_token [rows], position, cache) -> (logits [rows, vocab], cache)`
function inside one jax.lax loop, vectorized over images x beams or images x
samples, with the encoder run once per image (its K/V cached once per image).

  greedy_decode      argmax per position
  beam_search        all W beams with their summed log-probabilities, best first
                     (and, with return_valid=True, which beams are real sequences)
  sample_sequences   N samples per image; temperature, top-k, top-p; per-image keys
  CellTrie           optional constraint: only cells with training data; a jit
                     ARGUMENT (never a closed-over constant)
  cached_cell_trie   build_cell_trie from a token array, cached on disk (.npz)
  mix_neighbors      kNN-LM: wraps a tokens_to_logits so that the decoded distribution is
                     lambda p_kNN(y) + (1 - lambda) p_dec(y) over the image's retrieved
                     neighbours' token paths (knn_lm; strategies' knn_lambda=...)
  select             pool selection rules (logprob, vote, medoid, mean)
  top_candidates     top-k distinct candidates with normalized probabilities
  strategies         strategy strings; decode_pool (a strategy's pool on a
                     GeoTokenModel: tokens, log_prob, latlng, valid) and choose
"""

from geotoken_jax.decoding.beam import DEAD_SCORE, BeamState, beam_search, check_beam_size
from geotoken_jax.decoding.constraints import (MASKED_LOGIT, CellTrie, build_cell_trie, cached_cell_trie,
                                               load_cell_trie, save_cell_trie, trie_cache_key)
from geotoken_jax.decoding.greedy import greedy_decode
from geotoken_jax.decoding.knn_lm import KnnLMState, gated_lambda, knn_lm_logits, mix_neighbors
from geotoken_jax.decoding.sampling import (check_sampling, filter_logits, filtered_sampling_logits,
                                            sample_sequences)
from geotoken_jax.decoding.selection import SELECTION_RULES, Selection, select, top_candidates
