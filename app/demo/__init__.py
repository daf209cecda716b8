"""`geovr-pipeline demo`: the whole pipeline end to end on CPU in minutes, with tiny random models.

Modules: `config` (section `demo`), `run` (the stages), `summary` (summary.json and the console
table), `report` (report.md), `figures` (the loss plots); the held-out measurement and the
image-blind baselines are `geovr.eval.heldout`.

Every stage calls the same Python API as its CLI command, on a synthetic corpus whose scenes are
split into training scenes and held-out scenes. Stages, each timed, and what they write under OUT:

    1 corpus      corpus/                  procedural scenes: H.264 videos + exact 3D ground truth
    2 models      models/vggt-tiny/        random VGGT (tiny-a sizes, fixed seed), the teacher
                  models/da3-metric-tiny/  random DA3-Metric (GeoVR's scale teacher: the metric scale)
                  models/qwen3vl-tiny/     random Qwen3-VL, the student's base
    3 questions   vsibench/                VSI-Bench-style questions of the held-out scenes (+ videos)
                  qa/train.jsonl           questions of the training scenes as LLaVA conversations
                  qa/heldout.jsonl         the same for the held-out scenes (held-out losses only)
    4 index       manifest.parquet         clips of both QA files (one clip per video)
    5 precompute  store/                   teacher labels of every clip, on a local Ray cluster
                  store-heldout/           the held-out clips, copied as encoded (for `eval geometry`)
    6 train       run/                     the student trained on qa/train.jsonl; the held-out losses
                                           are measured before and after training
    7 export      export/                  plain Qwen3-VL checkpoint
    8 eval        eval/vsibench/, eval/geometry/   held-out questions and held-out clips
    9 inspect     inspect/                 depth panels, trajectory, point clouds of a held-out clip
   10 report      report.md, summary.json, figures/

Held-out losses: the student before training (the base model with the trainer's initial heads:
same seed, same construction as `student.training`) and after training are run on held-out clips
with held-out conversations; each geometric loss is the mean over those samples. The depth AbsRel
of the student against the teacher labels is set beside predictors that see no image: a per-frame
constant and the training clips' mean depth map, both with the per-frame median alignment that
`eval geometry` applies to the student, and without alignment (the training-set mean depth).

The tiny teachers are random checkpoints written by `geovr.teachers.tiny` (its docstring says how
their outputs are calibrated); the metric teacher is calibrated on rendered rooms of the corpus.
"""
