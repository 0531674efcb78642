"""Studies: a named grid of settings x seeds (conf/sweep/NAME.yaml) run as Hydra multiruns of train.py and collected
into tables and plots. ``python sweep.py`` is the command line (cli.main); docs/sweep.md is the reference.

    spec        load and check a study yaml (SweepError, the study dict)
    overrides   values as text: Hydra override strings, the short form in setting ids and table cells
    expand      settings x grid -> Settings; their setting config files; composing them once before launching
    layout      the out_dir: run dirs, run states, results.json / study.json
    launch      plan the multiruns, build the train.py commands, run them, lock, stale-run warnings
    collect     results.json of every run -> a row per setting (mean / std over seeds, failures)
    report      table.csv, table.md, best.md, failures.md, generic plots, then the study's report plug-ins
    plots       the generic plots (a metric vs regularization strength, a panel per k)
    reports/    report plug-ins chosen by a study's ``reports:`` (gaps, methods, bound_vs_k, or any _target_)
    cli         the sweep.py command line
"""
