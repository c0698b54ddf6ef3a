"""Defect detection in the toolchain: synthetic surfaces with boxed defects, mAP, the edge and cloud
detectors, their export with decoding inside the graph, the cascade's threshold and the cards
(docs/design.md §10).

As for classification, only :mod:`.nets`, :mod:`.export` and :mod:`.build` need torch; the data set,
the metric and the offline cascade rule run with numpy alone.
"""
