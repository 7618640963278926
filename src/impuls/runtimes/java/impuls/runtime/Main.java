package impuls.runtime;

import com.fasterxml.jackson.core.type.TypeReference;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Impuls's Java 17 Lambda runtime: a Runtime API (2018-06-01) client.  Started by the package's
 * generated {@code bootstrap} as {@code java ... impuls.runtime.Main [unix socket]}; the socket
 * path (IMPULS_RUNTIME_API_SOCKET, which the bootstrap removed from the environment) is an
 * argument because Java cannot unset its own environment.
 */
public final class Main {
    private static final String API = "/2018-06-01/runtime/";
    private static final String TRACE_PROPERTY = "com.amazonaws.xray.traceHeader";
    private static final TypeReference<Map<String, Object>> MAP = new TypeReference<>() { };

    private Main() {
    }

    public static void main(String[] args) throws IOException {
        RuntimeApi api = new RuntimeApi(args.length > 0 ? args[0] : null, System.getenv("AWS_LAMBDA_RUNTIME_API"));
        Handler handler;
        try {
            handler = Handler.load(System.getenv("_HANDLER"));
        } catch (UserError e) {
            report(e);
            api.request("POST", API + "init/error", errorHeaders(e), errorDocument(e));
            System.exit(1);
            return;
        }
        // Jackson's writer is made now, in init, not in the first call (as the reader was, by Handler)
        Handler.JSON.writeValueAsBytes(Map.of("init", List.of(true)));
        Map<String, String> none = Collections.emptyMap();
        while (true) {
            RuntimeApi.Response next = api.request("GET", API + "invocation/next", none, null);
            if (next.status != 200) {
                throw new IOException("invocation/next answered " + next.status);
            }
            String requestId = next.header("Lambda-Runtime-Aws-Request-Id");
            String trace = next.header("Lambda-Runtime-Trace-Id");
            if (trace != null) {
                System.setProperty(TRACE_PROPERTY, trace);
            } else {
                System.clearProperty(TRACE_PROPERTY);
            }
            byte[] result = null;
            UserError error = null;
            try {
                InvocationContext context = new InvocationContext(requestId,
                        next.header("Lambda-Runtime-Invoked-Function-Arn"), deadline(next),
                        InvocationContext.identity(json(next.header("Lambda-Runtime-Cognito-Identity"))),
                        InvocationContext.clientContext(json(next.header("Lambda-Runtime-Client-Context"))));
                result = handler.invoke(next.body, context);
            } catch (UserError e) {
                error = e;
            } catch (RuntimeException e) {
                error = UserError.of(e);
            }
            String path = API + "invocation/" + requestId;
            if (error == null) {
                System.out.flush();
                System.err.flush();
                api.request("POST", path + "/response", none, result);
            } else {
                report(error);
                api.request("POST", path + "/error", errorHeaders(error), errorDocument(error));
            }
        }
    }

    private static long deadline(RuntimeApi.Response next) {
        try {
            return Long.parseLong(next.header("Lambda-Runtime-Deadline-Ms"));
        } catch (NumberFormatException e) {
            return Long.MAX_VALUE;
        }
    }

    private static Map<String, Object> json(String header) {
        if (header == null || header.isEmpty()) {
            return null;
        }
        try {
            return Handler.JSON.readValue(header, MAP);
        } catch (IOException e) {
            return null;
        }
    }

    /** The error and its stack trace in the function's log (flushed: the log is read when the error arrives). */
    private static void report(UserError e) {
        Throwable cause = e.getCause();
        System.out.flush();
        if (cause != null) {
            cause.printStackTrace();
        } else {
            System.err.println(e.type + ": " + e.getMessage());
        }
        System.err.flush();
    }

    private static Map<String, String> errorHeaders(UserError e) {
        return Map.of("Lambda-Runtime-Function-Error-Type", e.type);
    }

    private static byte[] errorDocument(UserError e) {
        List<String> trace = new ArrayList<>();
        Throwable cause = e.getCause();
        if (cause != null) {
            for (StackTraceElement frame : cause.getStackTrace()) {
                if (frame.getClassName().startsWith("impuls.runtime.")) {
                    break;  // the runtime's own frames are not the user's
                }
                trace.add(frame.toString());
            }
        }
        Map<String, Object> doc = new LinkedHashMap<>();
        doc.put("errorMessage", e.getMessage());
        doc.put("errorType", e.type);
        doc.put("stackTrace", trace);
        try {
            return Handler.JSON.writeValueAsBytes(doc);
        } catch (IOException unexpected) {
            return ("{\"errorType\":\"" + e.type + "\"}").getBytes(StandardCharsets.UTF_8);
        }
    }
}
