package com.amazonaws.services.lambda.runtime;

/** The invocation's context, as in Lambda's aws-lambda-java-core. */
public interface Context {
    String getAwsRequestId();

    String getLogGroupName();

    String getLogStreamName();

    String getFunctionName();

    String getFunctionVersion();

    String getInvokedFunctionArn();

    /** The caller's Cognito identity; null when the call carried none. */
    CognitoIdentity getIdentity();

    /** The mobile client's context; null when the call carried none. */
    ClientContext getClientContext();

    /** Milliseconds left before the invocation times out. */
    int getRemainingTimeInMillis();

    int getMemoryLimitInMB();

    LambdaLogger getLogger();
}
