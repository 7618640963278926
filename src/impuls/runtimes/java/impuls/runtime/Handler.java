package impuls.runtime;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import com.amazonaws.services.lambda.runtime.RequestStreamHandler;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.ObjectReader;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.util.Arrays;
import java.util.Comparator;

/**
 * The user's handler, loaded once: {@code package.Class::method} (a public method taking the
 * event and optionally the Context, or an InputStream, an OutputStream and optionally the
 * Context) or {@code package.Class} (a RequestHandler or RequestStreamHandler).  Events are read
 * into the method's parameter type and results written with Jackson.
 */
final class Handler {
    static final ObjectMapper JSON = new ObjectMapper()
            .configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);

    private final Object target;
    private final Method method;
    private final boolean stream;
    private final boolean takesContext;
    /** reads the event into the handler's parameter type (its deserializer made at init); null: no event */
    private final ObjectReader input;

    private Handler(Object target, Method method, boolean stream) {
        this.target = target;
        this.method = method;
        this.stream = stream;
        int count = method.getParameterCount();
        this.takesContext = count > 0 && method.getParameterTypes()[count - 1] == Context.class;
        int events = stream ? 0 : count - (takesContext ? 1 : 0);
        this.input = events == 1 ? JSON.readerFor(JSON.constructType(method.getGenericParameterTypes()[0])) : null;
    }

    /** Load the class named by {@code spec} and find its handler method (init errors as UserError). */
    static Handler load(String spec) throws UserError {
        if (spec == null || spec.isEmpty() || spec.startsWith("::") || spec.endsWith("::")) {
            throw new UserError("Runtime.MalformedHandlerName",
                    "Bad handler '" + spec + "': expected 'package.Class' or 'package.Class::method'", null);
        }
        int sep = spec.indexOf("::");
        String className = sep < 0 ? spec : spec.substring(0, sep);
        String methodName = sep < 0 ? null : spec.substring(sep + 2);
        Class<?> cls;
        try {
            cls = Class.forName(className, true, Handler.class.getClassLoader());
        } catch (ClassNotFoundException | NoClassDefFoundError e) {
            throw new UserError("Runtime.ImportModuleError", "Class not found: " + e.getMessage(), e);
        } catch (ExceptionInInitializerError e) {
            throw UserError.of(e.getCause() == null ? e : e.getCause());
        } catch (LinkageError e) {  // a class file this JVM cannot use (version, format, verification)
            throw new UserError("Runtime.UserCodeSyntaxError", e.toString(), e);
        }
        Method method = methodName == null ? interfaceMethod(cls) : namedMethod(cls, methodName);
        if (method == null) {
            String what = methodName == null
                    ? "Class " + className + " does not implement RequestHandler or RequestStreamHandler"
                    : "No public method named " + methodName + " with a handler's parameters in class " + className;
            throw new UserError("Runtime.HandlerNotFound", what, null);
        }
        Object target = null;
        if (!Modifier.isStatic(method.getModifiers())) {
            try {
                target = cls.getConstructor().newInstance();
            } catch (NoSuchMethodException | IllegalAccessException | InstantiationException e) {
                throw new UserError("Runtime.HandlerNotFound",
                        "Class " + className + " has no public constructor without arguments", e);
            } catch (InvocationTargetException e) {
                throw UserError.of(e.getCause());
            }
        }
        boolean stream = method.getParameterCount() >= 2 && method.getParameterTypes()[0] == InputStream.class
                && method.getParameterTypes()[1] == OutputStream.class;
        method.setAccessible(true);
        return new Handler(target, method, stream);
    }

    private static Method interfaceMethod(Class<?> cls) {
        if (RequestStreamHandler.class.isAssignableFrom(cls)) {
            return method(cls, "handleRequest", InputStream.class, OutputStream.class, Context.class);
        }
        if (!RequestHandler.class.isAssignableFrom(cls)) {
            return null;
        }
        // the most specific handleRequest(I, Context): its generic parameter is the event's type
        return Arrays.stream(cls.getMethods())
                .filter(m -> m.getName().equals("handleRequest") && !m.isBridge() && m.getParameterCount() == 2
                        && m.getParameterTypes()[1] == Context.class)
                .min(Comparator.comparing(m -> m.getParameterTypes()[0] == Object.class))
                .orElse(null);
    }

    private static Method method(Class<?> cls, String name, Class<?>... types) {
        try {
            return cls.getMethod(name, types);
        } catch (NoSuchMethodException e) {
            return null;
        }
    }

    private static Method namedMethod(Class<?> cls, String name) {
        // Lambda's order: the stream forms, then (event, Context), (event), () — most parameters first
        return Arrays.stream(cls.getMethods())
                .filter(m -> m.getName().equals(name) && !m.isBridge() && acceptable(m))
                .max(Comparator.comparingInt(Method::getParameterCount))
                .orElse(null);
    }

    private static boolean acceptable(Method m) {
        Class<?>[] p = m.getParameterTypes();
        switch (p.length) {
            case 0:
            case 1:
                return true;
            case 2:
                return p[1] == Context.class || (p[0] == InputStream.class && p[1] == OutputStream.class);
            case 3:
                return p[0] == InputStream.class && p[1] == OutputStream.class && p[2] == Context.class;
            default:
                return false;
        }
    }

    /** Run the handler on the event's bytes; the result's bytes (JSON, or what a stream handler wrote). */
    byte[] invoke(byte[] event, Context context) throws UserError {
        Object[] args;
        ByteArrayOutputStream output = null;
        if (stream) {
            output = new ByteArrayOutputStream();
            args = takesContext ? new Object[] {new ByteArrayInputStream(event), output, context}
                    : new Object[] {new ByteArrayInputStream(event), output};
        } else {
            if (input == null) {
                args = takesContext ? new Object[] {context} : new Object[0];
            } else {
                Object value;
                try {
                    value = input.readValue(event);
                } catch (Exception e) {
                    throw new UserError("Runtime.UnmarshalError", "Unable to unmarshal input: " + e.getMessage(), e);
                }
                args = takesContext ? new Object[] {value, context} : new Object[] {value};
            }
        }
        Object result;
        try {
            result = method.invoke(target, args);
        } catch (InvocationTargetException e) {
            throw UserError.of(e.getCause());
        } catch (IllegalAccessException e) {
            throw UserError.of(e);
        }
        if (output != null) {
            return output.toByteArray();
        }
        try {
            return JSON.writeValueAsBytes(result);
        } catch (Exception | StackOverflowError e) {
            throw new UserError("Runtime.MarshalError", "Unable to marshal response: " + e.getMessage(), e);
        }
    }
}
