package impuls.runtime;

import com.amazonaws.services.lambda.runtime.Client;
import com.amazonaws.services.lambda.runtime.ClientContext;
import com.amazonaws.services.lambda.runtime.CognitoIdentity;
import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.LambdaLogger;
import com.amazonaws.services.lambda.runtime.LambdaRuntime;
import java.util.Map;

/** One invocation's {@link Context}: the request's headers and the instance's environment. */
final class InvocationContext implements Context {
    private final String requestId;
    private final String invokedFunctionArn;
    private final long deadlineMs;
    private final CognitoIdentity identity;
    private final ClientContext clientContext;

    InvocationContext(String requestId, String invokedFunctionArn, long deadlineMs,
                      CognitoIdentity identity, ClientContext clientContext) {
        this.requestId = requestId;
        this.invokedFunctionArn = invokedFunctionArn;
        this.deadlineMs = deadlineMs;
        this.identity = identity;
        this.clientContext = clientContext;
    }

    private static String env(String name) {
        String value = System.getenv(name);
        return value == null ? "" : value;
    }

    @Override
    public String getAwsRequestId() {
        return requestId;
    }

    @Override
    public String getLogGroupName() {
        return env("AWS_LAMBDA_LOG_GROUP_NAME");
    }

    @Override
    public String getLogStreamName() {
        return env("AWS_LAMBDA_LOG_STREAM_NAME");
    }

    @Override
    public String getFunctionName() {
        return env("AWS_LAMBDA_FUNCTION_NAME");
    }

    @Override
    public String getFunctionVersion() {
        return env("AWS_LAMBDA_FUNCTION_VERSION");
    }

    @Override
    public String getInvokedFunctionArn() {
        return invokedFunctionArn;
    }

    @Override
    public CognitoIdentity getIdentity() {
        return identity;
    }

    @Override
    public ClientContext getClientContext() {
        return clientContext;
    }

    @Override
    public int getRemainingTimeInMillis() {
        long left = deadlineMs - System.currentTimeMillis();
        return (int) Math.max(0, Math.min(Integer.MAX_VALUE, left));
    }

    @Override
    public int getMemoryLimitInMB() {
        try {
            return Integer.parseInt(env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"));
        } catch (NumberFormatException e) {
            return 0;
        }
    }

    @Override
    public LambdaLogger getLogger() {
        return LambdaRuntime.getLogger();
    }

    /** The Lambda-Runtime-Cognito-Identity document, or null. */
    static CognitoIdentity identity(Map<String, Object> doc) {
        if (doc == null) {
            return null;
        }
        String id = string(doc.get("cognitoIdentityId"));
        String pool = string(doc.get("cognitoIdentityPoolId"));
        return new CognitoIdentity() {
            @Override
            public String getIdentityId() {
                return id;
            }

            @Override
            public String getIdentityPoolId() {
                return pool;
            }
        };
    }

    /** The Lambda-Runtime-Client-Context document ({client, custom, env}), or null. */
    @SuppressWarnings("unchecked")
    static ClientContext clientContext(Map<String, Object> doc) {
        if (doc == null) {
            return null;
        }
        Map<String, Object> client = doc.get("client") instanceof Map ? (Map<String, Object>) doc.get("client") : null;
        Map<String, String> custom = strings(doc.get("custom"));
        Map<String, String> environment = strings(doc.get("env"));
        Client app = client == null ? null : new Client() {
            @Override
            public String getInstallationId() {
                return string(client.get("installation_id"));
            }

            @Override
            public String getAppTitle() {
                return string(client.get("app_title"));
            }

            @Override
            public String getAppVersionName() {
                return string(client.get("app_version_name"));
            }

            @Override
            public String getAppVersionCode() {
                return string(client.get("app_version_code"));
            }

            @Override
            public String getAppPackageName() {
                return string(client.get("app_package_name"));
            }
        };
        return new ClientContext() {
            @Override
            public Client getClient() {
                return app;
            }

            @Override
            public Map<String, String> getCustom() {
                return custom;
            }

            @Override
            public Map<String, String> getEnvironment() {
                return environment;
            }
        };
    }

    private static String string(Object value) {
        return value == null ? null : value.toString();
    }

    private static Map<String, String> strings(Object value) {
        if (!(value instanceof Map)) {
            return null;
        }
        Map<String, String> out = new java.util.LinkedHashMap<>();
        for (Map.Entry<?, ?> entry : ((Map<?, ?>) value).entrySet()) {
            out.put(String.valueOf(entry.getKey()), string(entry.getValue()));
        }
        return out;
    }
}
