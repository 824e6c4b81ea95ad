"""Self-configuration: the dataset fingerprint (:mod:`.fingerprint`), plans per configuration
(:mod:`.plans`), cross-validation with the choice of configuration, ensemble and post-processing
(:mod:`.crossval`, :mod:`.selection`), and moving a model between machines (:mod:`.archive`)."""
