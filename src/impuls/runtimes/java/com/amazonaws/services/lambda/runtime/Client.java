package com.amazonaws.services.lambda.runtime;

/** The mobile client application that made the call. */
public interface Client {
    String getInstallationId();

    String getAppTitle();

    String getAppVersionName();

    String getAppVersionCode();

    String getAppPackageName();
}
