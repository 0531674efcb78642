#!/usr/bin/env python
"""Run a named study (a grid of settings x seeds, conf/sweep/NAME.yaml) through one Hydra multirun of train.py, then
collect every run's results.json into tables and plots. The code is the package amortlab/studies/; docs/sweep.md is
the reference.

    python sweep.py study=air_strength                      # launch the runs not finished yet, then collect
    python sweep.py study=air_strength launcher=joblib hydra.launcher.n_jobs=4 seeds=[0,1,2]
    python sweep.py study=air_strength dry_run=true         # print the settings and commands, launch nothing
    python sweep.py study=air_strength collect_only=true    # only (re)write the tables and plots
    python sweep.py study_file=my_study.yaml out_dir=/tmp/s trainer.max_epochs=5   # extra overrides go to every run
    python sweep.py -h                                      # the options and the studies
"""
import sys

from amortlab.studies.cli import main

if __name__ == "__main__":
    sys.exit(main())
