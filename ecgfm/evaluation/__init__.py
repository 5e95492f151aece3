"""Evaluation beyond the training loop: one checkpoint scored on several lead subsets (``ecgfm.evaluation.subsets``)
and the per-split tables callback (``ecgfm.evaluation.tables``). Import the module you need; this package imports
nothing, so the task can use the tables callback without loading the evaluators that load tasks.

The statistics, in numpy and scipy (docs/evaluation.md): weighted metrics (``metrics_np``), the patient-level
stratified bootstrap and ``Interval`` (``bootstrap``), Wilson and Clopper-Pearson intervals (``proportions``),
DeLong's test and the paired bootstrap (``compare``), thresholds and their reports (``thresholds``), calibration,
temperature and Bland-Altman agreement (``calibration``), a model's heads calibrated on the validation split
(``temperature``).

The report (docs/report.md, ``ecgfm report``): a model's outputs per segment, record or patient (``units``),
subgroups from the shards' metadata (``subgroups``), the figures (``figures``), the metrics of every head
(``report``) and the folder with its HTML and Markdown pages (``report_pages``)."""
