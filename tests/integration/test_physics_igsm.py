"""Physics training resumes bit-identically (a 1-layer model): the model-building part of
``tests/unit/test_physics_igsm.py``."""
from __future__ import annotations

import torch


def test_physics_training_resumes_identically(tmp_path):
    from interpkit.analyses.physics.train import PhysicsTrainConfig, train

    kw = dict(task="igsm", task_options={"n_vars": 4, "n_leaves": 2}, n_layers=1, d_model=16, n_heads=2,
              max_positions=96, steps=4, batch_size=4, warmup_steps=1, progress=False, save_every=2, log_every=1)
    full = train(PhysicsTrainConfig(**kw, output_dir=str(tmp_path / "a")))[0]
    train(PhysicsTrainConfig(**kw, output_dir=str(tmp_path / "b")), stop_at=2)
    resumed = train(PhysicsTrainConfig(**kw, output_dir=str(tmp_path / "b")))[0]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
