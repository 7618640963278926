"""AWS Lambda's own API (rest-json, SigV4) on the server's port: the door for boto3, the AWS CLI
and Terraform.  :mod:`.door` is the ASGI entry, :mod:`.routing` matches operations,
:mod:`.handlers` holds one function per operation, :mod:`.shapes` the response shapes,
:mod:`.errors` the condition → Lambda error table."""
