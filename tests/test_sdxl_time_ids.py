"""models.embeddings.sdxl_time_ids, the one builder of SDXL's micro-conditioning rows used by the
caches, calibration, sampling and the synthetic batches: hand-written rows."""

import numpy as np

from safealign_jax.models.embeddings import sdxl_time_ids


def test_square_default_rows():
    ids = sdxl_time_ids(3, 1024)
    assert ids.dtype == np.float32 and ids.shape == (3, 6)
    np.testing.assert_array_equal(ids, [[1024, 1024, 0, 0, 1024, 1024]] * 3)


def test_original_crop_and_target_in_diffusers_order():
    ids = sdxl_time_ids(2, 768, 1344, crop=(16, 8), original=(1080, 1920))
    np.testing.assert_array_equal(ids, [[1080, 1920, 16, 8, 768, 1344]] * 2)
    np.testing.assert_array_equal(sdxl_time_ids(1, 64, target=(32, 48)), [[64, 64, 0, 0, 32, 48]])
