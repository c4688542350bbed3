"""The synthetic-world demo (README's main command): pretrain a tiny base, build CoProV2-style
pairs, train per-category experts, merge (average / task arithmetic / TIES / DARE / Co-Merge),
train the all-single baseline and the PSA adapter, evaluate with the oracle, export.

    python scripts/demo.py --config configs/demo.py --workdir runs/demo          # full (~11 min)
    python scripts/demo.py --config configs/demo.py:quick --workdir runs/quick   # CI (~5 min)
"""

import ml_collections

from safealign_jax.configs import choose_preset, train

PRESETS = ("default", "quick")


def _expert(steps: int, lr: float, beta: float):
    c = train.get_config("tiny")
    c.lora.rank, c.lora.alpha = 4, 4.0
    c.dpo.beta, c.dpo.caption_dropout = beta, 0.0
    c.optim.learning_rate, c.optim.scale_lr_by_pairs, c.optim.warmup_steps = lr, False, 20
    c.optim.weight_decay = 0.0
    c.train.steps, c.train.pairs_per_device = steps, 16
    c.train.log_every, c.train.checkpoint_every, c.train.keep_checkpoints = 50, steps, 1
    c.data.resolution, c.data.seq_len, c.data.latent_channels = 16, 16, 48
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = choose_preset("demo", arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.progress = True
    c.base_cache = ""  # folder of pretrained bases keyed by their settings; "" = WORKDIR/base_cache

    c.world = ml_collections.ConfigDict()
    c.world.num_categories = 7
    c.world.concepts_per_category = 3

    c.base = ml_collections.ConfigDict()
    c.base.block_out_channels = (64,)  # one level: 4x4 latents need no downsampling
    c.base.block_size = 4  # space-to-depth factor: 16x16x3 images <-> 4x4x48 latents
    # Text-state width D. The closed-form edits are one linear map of these states: at 64, one map
    # cannot move 21 harmful concepts onto their safe counterparts and keep the other 30 objects
    # (default world, seed 2, all 7 categories at once: fit residual 0.49, IP-any 0.155, 58% drawn
    # as the safe counterpart); at 128 (SD's CLIP: 768): residual 0.18, IP-any 0.012, 98% (README).
    c.base.text_width = 128
    c.base.steps = 5000
    c.base.batch = 64
    c.base.learning_rate = 2e-3
    c.base.prediction_type = "sample"  # x0: learns this world fastest (epsilon / v: far slower)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.steps = 20  # DDIM
    c.sampling.guidance = 1.0  # the prompt fixes all but the position; CFG > 1 over-saturates x0
    c.sampling.batch = 128

    c.data = ml_collections.ConfigDict()
    c.data.pairs_per_concept = 48

    # beta: the world's x0-prediction errors are on another scale than SD's epsilon ones, and the
    # damage to other prompts rises steeply as beta falls (README, "What the demo shows": swept
    # 150..2500 for the experts, 20..150 for PSA).
    c.expert = _expert(steps=300, lr=1e-3, beta=1000.0)
    # Expert objectives trained and merged, each {dpo field: value} over c.expert.dpo: "dpo" is
    # the papers' (Diffusion-DPO alone); "regularised" adds SFT on the preferred image and the
    # preservation term on retain prompts (safe rewrites and neutral prompts).
    c.objectives = ml_collections.ConfigDict({"dpo": {}, "regularised": {"sft_weight": 1.0, "preserve_weight": 10.0}})

    # Closed-form cross-attention edit (safealign_jax.erase): harmful -> safe prompt of every pair,
    # the safe rewrites and neutral prompts preserved.
    c.erase = ml_collections.ConfigDict()
    c.erase.preserve_weight = 1.0  # the per-category edits of gated PSA and the fusion use it too
    # The same edit at other weights, each a method of its own ("erase_w0.7"): a lower weight erases
    # harder at some cost to safe prompts (64-wide text states, seed 0: weight 1 drew 12.5% of harmful
    # prompts as another harmful object, 0.7 9.5%; at 128 wide both draw 0-1.2% on seeds 0-2).
    c.erase.other_preserve_weights = (0.7,)
    c.erase.ridge = 1e-3

    c.merge = ml_collections.ConfigDict()
    c.merge.task_lambda = 1.0
    c.merge.ties_density = 0.2
    c.merge.ties_lambda = 1.0
    c.merge.dare_drop = 0.5
    c.merge.granularity = "weight"
    c.merge.statistic = "mean_abs"
    c.merge.calibration_examples = 128
    c.merge.calibration_batch = 32
    c.merge.export_rank = 8

    c.curve = ml_collections.ConfigDict()
    c.curve.categories = (1, 3)  # the 7-category point is the main comparison

    c.psa = ml_collections.ConfigDict()
    # Training users (Sage has 900): with 50, gates fitted to their preferences recognise 98.5% of
    # unseen users' bans; with 300, all of them (docs/DEMO.md). Training cost does not grow with it.
    c.psa.users = 300
    c.psa.unseen_users = 10
    c.psa.embed_dim = 32
    c.psa.train = _expert(steps=600, lr=1e-3, beta=50.0)
    c.psa.train.psa.num_tokens = 1
    c.psa.train.psa.scale = 1.0
    # User-gated variant: the closed-form edit of each category, weighted by g(u) = sigmoid(W u + b);
    # only W and b train (E x C + C numbers: a large learning rate), on the same user-conditioned
    # pairs. Gates start closed (sigmoid(-3) = 0.05), so the policy starts near the reference.
    # Category routing (psa.gated.route) is off: on the quick world it raised over-suppression from
    # +0.05 to +0.11; on the default world it learns the banned categories' gates but leaves allowed
    # ones partly open (docs/DEMO.md, "User-gated PSA: what was tried").
    c.psa.gated = _expert(steps=600, lr=5e-2, beta=50.0)
    c.psa.gated.psa.variant = "gated"
    c.psa.gated.psa.gated.init_bias = -3.0
    c.psa.gated.psa.gated.route = False
    # The same per-category edits with gates fitted directly to the training users' preferences
    # (gated.fit_gates: the Bradley-Terry model per category, ridge l2), thresholded when `hard`.
    c.psa.fit = ml_collections.ConfigDict()
    c.psa.fit.l2 = 1e-3
    c.psa.fit.hard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.scenes_per_concept = 4  # x 2 held-out phrasings
    c.eval.scenes_per_neutral = 4
    c.eval.psa_users_per_group = 5

    if preset == "quick":
        c.world.num_categories, c.world.concepts_per_category = 3, 2
        c.base.steps = 1500
        c.base.text_width = 64  # 6 harmful concepts: one linear edit fits at 64 (IP-any 0.000-0.028)
        c.data.pairs_per_concept = 24
        c.expert.dpo.beta, c.expert.optim.learning_rate = 600.0, 1.5e-3
        c.expert.train.steps = 200
        c.expert.train.checkpoint_every = 200
        c.psa.train.dpo.beta = 150.0
        c.psa.train.train.steps = 200
        c.psa.train.train.checkpoint_every = 200
        # 100 training users: with 20, the fitted gates opened a category for users who ban nothing
        # (seed 2: over-suppression +0.093); with 100, +0.042 at most (seeds 0 and 2, docs/DEMO.md).
        c.psa.users, c.psa.unseen_users = 100, 5
        c.curve.categories = (1,)
        c.eval.scenes_per_concept, c.eval.scenes_per_neutral = 3, 2
        c.eval.psa_users_per_group = 3
        c.merge.calibration_examples = 64
    return c
