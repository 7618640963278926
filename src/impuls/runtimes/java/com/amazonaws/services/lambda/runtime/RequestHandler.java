package com.amazonaws.services.lambda.runtime;

/**
 * A handler whose event is JSON read into {@code I} and whose result {@code O} is written as JSON
 * (Jackson), as in Lambda's aws-lambda-java-core.
 */
public interface RequestHandler<I, O> {
    O handleRequest(I input, Context context);
}
