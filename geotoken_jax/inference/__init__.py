"""Inference: restoring a model and running decoding strategies, one module per concern.

  restore            load_run_config, restore_model (the run's config and TokenSpec, saved
                     with the checkpoint; its parameters on a mesh), restore_aligner (the
                     alignment model gallery:K / similarity / fused need), evaluate_config,
                     token_spec, image_size
  tries              build_tries: the cell tries of constrained decoding (cached on disk)
  location_gallery   LocationGallery, load_location_gallery: the locations an alignment
                     model ranks for gallery:K, with its location embeddings of them
  predictor          Predictor: one jitted function per strategy set; encodes each batch
                     ONCE and runs every strategy group (greedy, beams, sample pools, each
                     with its selection rules) on that memory; cell tries are arguments,
                     not constants baked into the program.  predict_batches (a source's
                     padded, masked global batches through it, gathered on the host),
                     validation_metrics (loss, token accuracy and acc@km: the trainer's
                     validation and final test)
  evaluation         run_evaluation: every strategy over a split or any source: the
                     predictions files (resumable), tables and plots
  embedding_job      Embedder (AlignerEmbedder: an alignment model; TinyImageEmbedder,
                     tiny_image_embedder: the tiny-image embedding), embed_function,
                     run_embedding: a split's embeddings, stored by geotoken_jax.embeddings
  online_retrieval   OnlineRetrieval: a retrieval-augmented run's neighbours for images the
                     index job never saw (the run's aligner embeds them, its neighbour
                     gallery is searched), inside evaluation and prediction
  files              predict_files: top-k cells of image files of any number, streamed in
                     batches, unreadable files reported, not fatal; geojson

The trainer's periodic validation, its final test, the evaluation job and the predict
command all decode through Predictor, so they cannot disagree on one checkpoint.

Dependencies run one way (the `inference` contract of .importlinter, top to bottom):
evaluation, files > online_retrieval, predictor > embedding_job, location_gallery, tries >
restore.  The modules import each other directly, never this package; the names below are
re-exported for callers outside it (`from geotoken_jax import inference;
inference.restore_model(...)`).
"""

from geotoken_jax.inference.embedding_job import (AlignerEmbedder, Embedder, TinyImageEmbedder, embed_function,
                                                  run_embedding, tiny_image_embedder)
from geotoken_jax.inference.evaluation import (check_evaluation, file_name, prediction_rows, read_predictions,
                                               run_evaluation, score_predictions, truth_countries, valid_truth,
                                               write_plots, write_results)
from geotoken_jax.inference.files import (IMAGE_SUFFIXES, FilePrediction, geojson, list_images, load_image_file,
                                          predict_files, s2_cell_token)
from geotoken_jax.inference.location_gallery import (LocationGallery, gallery_with_features, load_location_gallery,
                                                     location_features)
from geotoken_jax.inference.online_retrieval import OnlineRetrieval, evaluation_source, uses_neighbors
from geotoken_jax.inference.predictor import (Predictor, StrategyGroup, gallery_pool, group_strategies,
                                              predict_batches, validation_metrics)
from geotoken_jax.inference.restore import (EVALUATE_DEFAULTS, RestoredModel, abstract_params, checkpoint_dir,
                                            evaluate_config, image_size, load_run_config, restore_aligner,
                                            restore_model, token_spec)
from geotoken_jax.inference.tries import build_tries, trie_key

__all__ = [
    "AlignerEmbedder", "Embedder", "TinyImageEmbedder", "tiny_image_embedder",
    "EVALUATE_DEFAULTS", "IMAGE_SUFFIXES", "FilePrediction", "LocationGallery", "OnlineRetrieval", "Predictor",
    "RestoredModel", "StrategyGroup", "abstract_params", "build_tries", "check_evaluation", "checkpoint_dir",
    "embed_function", "evaluate_config", "evaluation_source", "file_name", "gallery_pool", "gallery_with_features",
    "geojson", "group_strategies", "image_size", "list_images", "load_image_file", "load_location_gallery",
    "load_run_config", "location_features", "predict_batches", "predict_files", "prediction_rows",
    "read_predictions", "restore_aligner", "restore_model", "run_embedding", "run_evaluation", "s2_cell_token",
    "score_predictions", "token_spec", "trie_key", "truth_countries", "uses_neighbors", "valid_truth",
    "validation_metrics", "write_plots", "write_results",
]
