package com.amazonaws.services.lambda.runtime;

/** Writes to the function's log (its standard output), as in Lambda's aws-lambda-java-core. */
public interface LambdaLogger {
    void log(String message);

    void log(byte[] message);
}
