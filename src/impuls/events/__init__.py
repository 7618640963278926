"""Asynchronous invocation and schedules: the durable event queue in the store
(:mod:`.store`, :mod:`.writer`), its delivery with Lambda's retry rules and destinations
(:mod:`.dispatcher`), and schedules firing events (:mod:`.schedules`, :mod:`.scheduler`)."""
