"""dynascope: pretrain small transformers and measure when interpretability phenomena emerge.

Subpackages: `dynascope.train` (models, data, Lightning pretraining, CLI), `dynascope.analysis`
(pure-torch analyses and the offline runner), `dynascope.callbacks` (Lightning adapters).
"""
