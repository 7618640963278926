package com.amazonaws.services.lambda.runtime;

import java.nio.charset.StandardCharsets;

/** The function's logger outside a handler call, as in Lambda's aws-lambda-java-core. */
public final class LambdaRuntime {
    private static final LambdaLogger LOGGER = new LambdaLogger() {
        @Override
        public void log(String message) {
            log(String.valueOf(message).getBytes(StandardCharsets.UTF_8));
        }

        @Override
        public void log(byte[] message) {
            synchronized (System.out) {
                System.out.write(message, 0, message.length);
                System.out.flush();
            }
        }
    };

    private LambdaRuntime() {
    }

    public static LambdaLogger getLogger() {
        return LOGGER;
    }
}
