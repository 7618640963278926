"""Function URLs: a function as an HTTP endpoint (:mod:`.door`), its request as a payload
format 2.0 event (:mod:`.event`), its result as the HTTP response (:mod:`.response`), CORS
(:mod:`.cors`)."""
