"""salient: saliency maps for image classifiers, as a reliable bulk job.

One import package with three parts, each its own folder in the repository:
``salient_maps.storage`` (settings, database, object stores; imports neither of the others),
``salient_maps.producer`` (the light side: the ``salient`` command, ``submit``; never imports torch) and
``salient_maps.workers`` (the heavy side: models, methods, the engine, Celery tasks).
"""
