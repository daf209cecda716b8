"""geovr.eval: VSI-Bench harness and scorer, geometry metrics of the student, reports and pictures."""
