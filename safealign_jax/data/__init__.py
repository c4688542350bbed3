"""Data: readers of the released CoProV2 / Sage / evaluation files, validation, TFDS builders
(array_record, no TensorFlow) and the grain loader.

Modules: categories (taxonomies), tables (CSV reading), validation (problem reports and
policies), coprov2, sage, users, eval_prompts (readers), tfds_builders, views (training-example
schema over built data), images (decode/resize/crop/flip), loader (grain pipeline).
"""
