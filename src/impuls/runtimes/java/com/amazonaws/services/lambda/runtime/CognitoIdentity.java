package com.amazonaws.services.lambda.runtime;

/** The Amazon Cognito identity that made the call. */
public interface CognitoIdentity {
    String getIdentityId();

    String getIdentityPoolId();
}
