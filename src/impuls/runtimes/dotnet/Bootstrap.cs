// Impuls runtime client for C# on Mono: speaks the Lambda Runtime API (2018-06-01).
//
// Compiled at deploy into impuls_bootstrap.exe next to the function's assembly and started by
// the package's ./bootstrap (`mono --debug impuls_bootstrap.exe`).  It loads the handler named by
// _HANDLER, `Assembly::Namespace.Class::Method` as on Lambda (an instance method's class is
// created once, with its parameterless constructor), then loops: GET .../invocation/next, call
// the handler, POST the result (or the error) back, over one persistent HTTP/1.1 connection
// (the unix socket named by IMPULS_RUNTIME_API_SOCKET, removed from the environment before user
// code loads, else TCP with TCP_NODELAY to AWS_LAMBDA_RUNTIME_API); each request goes out in one
// write.  The handler takes (input, ILambdaContext), (input) or (); the input and the result are
// POCOs (JSON through the assembly's or method's [LambdaSerializer], else Newtonsoft.Json) or a
// Stream (raw bytes); a Task or Task<T> result is awaited.

using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Net.Sockets;
using System.Reflection;
using System.Text;
using System.Threading.Tasks;
using Amazon.Lambda.Core;
using Newtonsoft.Json;

namespace Impuls.Runtime
{
    sealed class Fault : Exception
    {
        public readonly string ErrorType;

        public Fault(string errorType, string message) : base(message)
        {
            ErrorType = errorType;
        }
    }

    sealed class Response
    {
        public int Status;
        public Dictionary<string, string> Headers = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        public byte[] Body;
    }

    /// <summary>A minimal keep-alive HTTP/1.1 client for the Runtime API; reconnects when dropped.
    /// The Runtime API frames every answer with Content-Length.</summary>
    sealed class Connection
    {
        readonly string api;
        readonly string unixPath;
        public readonly string Host;
        Socket sock;
        byte[] buf = new byte[65536];
        int start, end;

        public Connection(string api, string unixPath)
        {
            this.api = api;
            this.unixPath = unixPath;
            Host = unixPath != null ? "localhost" : api;
        }

        Socket Connect()
        {
            if (unixPath != null)
            {
                sock = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                sock.Connect(new UnixDomainSocketEndPoint(unixPath));
            }
            else
            {
                int colon = api.LastIndexOf(':');
                string host = api.Substring(0, colon).Trim('[', ']');
                int port = int.Parse(api.Substring(colon + 1));
                sock = new Socket(SocketType.Stream, ProtocolType.Tcp);
                sock.NoDelay = true;
                sock.Connect(host, port);
            }
            start = end = 0;
            return sock;
        }

        void Close()
        {
            if (sock != null)
            {
                try { sock.Close(); } catch (Exception) { }
                sock = null;
            }
            start = end = 0;
        }

        public Response Request(byte[] data)
        {
            for (int attempt = 0; ; attempt++)
            {
                try
                {
                    var s = sock ?? Connect();
                    s.Send(data);
                    return Read(s);
                }
                catch (Exception e) when (e is SocketException || e is IOException || e is ObjectDisposedException)
                {
                    Close();
                    if (attempt >= 3) throw;
                    System.Threading.Thread.Sleep(20 * attempt); // the first retry at once: a dropped keep-alive
                }
            }
        }

        void Fill(Socket s)
        {
            if (start > 0 && end == buf.Length)
            {
                Buffer.BlockCopy(buf, start, buf, 0, end - start);
                end -= start;
                start = 0;
            }
            if (end == buf.Length) Array.Resize(ref buf, buf.Length * 2);
            int got = s.Receive(buf, end, buf.Length - end, SocketFlags.None);
            if (got == 0) throw new IOException("Runtime API closed the connection");
            end += got;
        }

        int HeadEnd()
        {
            for (int i = start; i + 3 < end; i++)
                if (buf[i] == '\r' && buf[i + 1] == '\n' && buf[i + 2] == '\r' && buf[i + 3] == '\n') return i;
            return -1;
        }

        Response Read(Socket s)
        {
            int head;
            while ((head = HeadEnd()) < 0) Fill(s);
            string[] lines = Encoding.ASCII.GetString(buf, start, head - start).Split(new[] { "\r\n" }, StringSplitOptions.None);
            var response = new Response { Status = int.Parse(lines[0].Split(' ')[1]) };
            for (int i = 1; i < lines.Length; i++)
            {
                int colon = lines[i].IndexOf(':');
                if (colon > 0) response.Headers[lines[i].Substring(0, colon).Trim()] = lines[i].Substring(colon + 1).Trim();
            }
            start = head + 4;
            string value;
            int length = response.Headers.TryGetValue("Content-Length", out value) ? int.Parse(value) : 0;
            while (end - start < length) Fill(s);
            response.Body = new byte[length];
            Buffer.BlockCopy(buf, start, response.Body, 0, length);
            start += length;
            if (start == end) start = end = 0;
            if (response.Headers.TryGetValue("Connection", out value) && value.Equals("close", StringComparison.OrdinalIgnoreCase)) Close();
            return response;
        }

        public void Post(string path, byte[] body, string extraHeaders)
        {
            byte[] head = Encoding.UTF8.GetBytes("POST " + path + " HTTP/1.1\r\nHost: " + Host + "\r\nContent-Type: application/json\r\n"
                                                 + "Content-Length: " + body.Length + "\r\n" + extraHeaders + "\r\n");
            var data = new byte[head.Length + body.Length];
            Buffer.BlockCopy(head, 0, data, 0, head.Length);
            Buffer.BlockCopy(body, 0, data, head.Length, body.Length);
            int status = Request(data).Status;
            if (status < 200 || status > 299) Program.Log("impuls runtime: POST " + path + " answered HTTP " + status + "\n");
        }
    }

    sealed class Logger : ILambdaLogger
    {
        public void Log(string message) { LambdaLogger.Log(message); }
        public void LogLine(string message) { LambdaLogger.Log(message + Environment.NewLine); }
    }

    sealed class CognitoIdentity : ICognitoIdentity
    {
        [JsonProperty("cognitoIdentityId")] public string IdentityId { get; set; }
        [JsonProperty("cognitoIdentityPoolId")] public string IdentityPoolId { get; set; }
    }

    sealed class ClientApplication : IClientApplication
    {
        [JsonProperty("app_package_name")] public string AppPackageName { get; set; }
        [JsonProperty("app_title")] public string AppTitle { get; set; }
        [JsonProperty("app_version_code")] public string AppVersionCode { get; set; }
        [JsonProperty("app_version_name")] public string AppVersionName { get; set; }
        [JsonProperty("installation_id")] public string InstallationId { get; set; }
    }

    sealed class ClientContext : IClientContext
    {
        [JsonProperty("env")] public Dictionary<string, string> Environment { get; set; }
        [JsonProperty("client")] public ClientApplication Client { get; set; }
        [JsonProperty("custom")] public Dictionary<string, string> Custom { get; set; }
        IDictionary<string, string> IClientContext.Environment { get { return Environment; } }
        IClientApplication IClientContext.Client { get { return Client; } }
        IDictionary<string, string> IClientContext.Custom { get { return Custom; } }
    }

    sealed class LambdaContext : ILambdaContext
    {
        static readonly ILambdaLogger SharedLogger = new Logger();
        static readonly DateTime Epoch = new DateTime(1970, 1, 1, 0, 0, 0, DateTimeKind.Utc);
        public static string Name, Version, Group, Stream;
        public static int Memory;
        public long DeadlineMs;

        public string AwsRequestId { get; set; }
        public IClientContext ClientContext { get; set; }
        public string FunctionName { get { return Name; } }
        public string FunctionVersion { get { return Version; } }
        public ICognitoIdentity Identity { get; set; }
        public string InvokedFunctionArn { get; set; }
        public ILambdaLogger Logger { get { return SharedLogger; } }
        public string LogGroupName { get { return Group; } }
        public string LogStreamName { get { return Stream; } }
        public int MemoryLimitInMB { get { return Memory; } }

        public TimeSpan RemainingTime
        {
            get
            {
                long left = DeadlineMs - (long)(DateTime.UtcNow - Epoch).TotalMilliseconds;
                return TimeSpan.FromMilliseconds(Math.Max(left, 0));
            }
        }
    }

    /// <summary>The handler, resolved once: how to read its input, call it, write its result.</summary>
    sealed class Handler
    {
        object target;
        MethodInfo method;
        Type inputType, resultType;
        bool takesContext, awaits;
        ILambdaSerializer serializer;
        MethodInfo deserialize, serialize;

        public static Handler Load(string spec, string taskRoot)
        {
            string[] parts = spec.Split(new[] { "::" }, StringSplitOptions.None);
            if (parts.Length != 3 || parts.Any(string.IsNullOrEmpty))
                throw new Fault("Runtime.MalformedHandlerName", "Bad handler '" + spec + "': must be Assembly::Namespace.Class::Method");
            Assembly assembly;
            try
            {
                assembly = Assembly.LoadFrom(Path.Combine(taskRoot, parts[0] + ".dll"));
            }
            catch (Exception e) when (e is FileNotFoundException || e is FileLoadException || e is BadImageFormatException)
            {
                throw new Fault("Runtime.ImportModuleError", "Unable to load assembly '" + parts[0] + "': " + e.Message);
            }
            Type type = assembly.GetType(parts[1], false);
            if (type == null)
                throw new Fault("Runtime.HandlerNotFound", "Type '" + parts[1] + "' missing in assembly '" + parts[0] + "'");
            MethodInfo[] candidates = type.GetMethods(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static)
                .Where(m => m.Name == parts[2]).ToArray();
            if (candidates.Length == 0)
                throw new Fault("Runtime.HandlerNotFound", "Method '" + parts[2] + "' missing on type '" + parts[1] + "'");
            if (candidates.Length > 1)
                throw new Fault("Runtime.HandlerNotFound", "Method '" + parts[2] + "' on type '" + parts[1] + "' is overloaded");
            var h = new Handler { method = candidates[0] };
            ParameterInfo[] ps = h.method.GetParameters();
            if (ps.Length > 2 || (ps.Length == 2 && ps[1].ParameterType != typeof(ILambdaContext)))
                throw new Fault("Runtime.HandlerNotFound", "Handler '" + spec + "' must take (input), (input, ILambdaContext) or ()");
            if (ps.Length > 0 && ps[0].ParameterType == typeof(ILambdaContext))
                throw new Fault("Runtime.HandlerNotFound", "Handler '" + spec + "': the ILambdaContext comes second, after the input");
            h.inputType = ps.Length > 0 ? ps[0].ParameterType : null;
            h.takesContext = ps.Length == 2;
            h.resultType = h.method.ReturnType;
            if (typeof(Task).IsAssignableFrom(h.resultType))
            {
                h.awaits = true;
                h.resultType = h.resultType.IsGenericType ? h.resultType.GetGenericArguments()[0] : typeof(void);
            }
            var attribute = h.method.GetCustomAttribute<LambdaSerializerAttribute>() ?? assembly.GetCustomAttribute<LambdaSerializerAttribute>();
            h.serializer = attribute != null
                ? (ILambdaSerializer)Activator.CreateInstance(attribute.SerializerType)
                : new Amazon.Lambda.Serialization.Json.JsonSerializer();
            Type iface = typeof(ILambdaSerializer);
            if (h.inputType != null && h.inputType != typeof(Stream))
                h.deserialize = iface.GetMethod("Deserialize").MakeGenericMethod(h.inputType);
            if (h.resultType != typeof(void) && !typeof(Stream).IsAssignableFrom(h.resultType))
                h.serialize = iface.GetMethod("Serialize").MakeGenericMethod(h.resultType);
            if (!h.method.IsStatic)
                h.target = Activator.CreateInstance(type); // the constructor runs once, at init
            return h;
        }

        /// <summary>The JSON (or raw) result of one call; the handler's own exceptions unwrapped.</summary>
        public byte[] Invoke(byte[] body, ILambdaContext context)
        {
            var args = new List<object>();
            if (inputType == typeof(Stream))
                args.Add(new MemoryStream(body, false));
            else if (inputType != null)
            {
                try
                {
                    args.Add(deserialize.Invoke(serializer, new object[] { new MemoryStream(body, false) }));
                }
                catch (TargetInvocationException e)
                {
                    throw new Fault("Runtime.UnmarshalError", "Unable to unmarshal input: " + e.InnerException.Message);
                }
            }
            if (takesContext) args.Add(context);
            // the handler's exception arrives wrapped in a TargetInvocationException (its own stack
            // trace intact): ErrorBody unwraps it
            object result = method.Invoke(target, args.ToArray());
            if (awaits)
            {
                var task = (Task)result;
                task.GetAwaiter().GetResult();
                result = resultType == typeof(void) ? null : task.GetType().GetProperty("Result").GetValue(task);
            }
            var stream = result as Stream;
            if (stream != null)
            {
                var copy = new MemoryStream();
                stream.CopyTo(copy);
                return copy.ToArray();
            }
            if (serialize == null) return Encoding.UTF8.GetBytes("null");
            try
            {
                var output = new MemoryStream();
                serialize.Invoke(serializer, new object[] { result, output });
                return output.ToArray();
            }
            catch (TargetInvocationException e)
            {
                throw new Fault("Runtime.MarshalError", "Unable to marshal response: " + e.InnerException.Message);
            }
        }
    }

    static class Program
    {
        const string RuntimePath = "/2018-06-01/runtime";

        public static void Log(string text)
        {
            try
            {
                Console.Error.Write(text);
                Console.Error.Flush();
            }
            catch (Exception) { }
        }

        static void Flush()
        {
            try { Console.Out.Flush(); } catch (Exception) { }
            try { Console.Error.Flush(); } catch (Exception) { }
        }

        static Exception Unwrap(Exception e)
        {
            while ((e is TargetInvocationException || e is TypeInitializationException) && e.InnerException != null) e = e.InnerException;
            var aggregate = e as AggregateException;
            if (aggregate != null && aggregate.InnerExceptions.Count == 1) return Unwrap(aggregate.InnerException);
            return e;
        }

        /// <summary>The error document (and its header) for an exception, logged first.</summary>
        static byte[] ErrorBody(Exception e, out string header)
        {
            e = Unwrap(e);
            var fault = e as Fault;
            string type = fault != null ? fault.ErrorType : e.GetType().Name;
            string[] trace = fault != null || e.StackTrace == null
                ? new string[0]
                : e.StackTrace.Split('\n').Select(l => l.Trim())
                    .Where(l => l.Length > 0 && !l.StartsWith("at Impuls.Runtime.") && !l.StartsWith("at (wrapper")).ToArray();
            Log("[ERROR] " + type + ": " + e.Message + "\n" + string.Join("\n", trace) + (trace.Length > 0 ? "\n" : ""));
            header = "Lambda-Runtime-Function-Error-Type: " + type.Replace("\r", "").Replace("\n", "") + "\r\n";
            var doc = new Dictionary<string, object> { { "errorMessage", e.Message }, { "errorType", type }, { "stackTrace", trace } };
            return Encoding.UTF8.GetBytes(JsonConvert.SerializeObject(doc));
        }

        static string Env(string name, string otherwise)
        {
            string value = Environment.GetEnvironmentVariable(name);
            return string.IsNullOrEmpty(value) ? otherwise : value;
        }

        static int Main()
        {
            string unixPath = Env("IMPULS_RUNTIME_API_SOCKET", null);
            Environment.SetEnvironmentVariable("IMPULS_RUNTIME_API_SOCKET", null);
            string api = Env("AWS_LAMBDA_RUNTIME_API", "");
            if (api == "" && unixPath == null)
            {
                Log("impuls runtime: AWS_LAMBDA_RUNTIME_API is not set\n");
                return 1;
            }
            LambdaContext.Name = Env("AWS_LAMBDA_FUNCTION_NAME", "");
            LambdaContext.Version = Env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST");
            LambdaContext.Group = Env("AWS_LAMBDA_LOG_GROUP_NAME", "");
            LambdaContext.Stream = Env("AWS_LAMBDA_LOG_STREAM_NAME", "");
            int.TryParse(Env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0"), out LambdaContext.Memory);
            var conn = new Connection(api, unixPath);
            string header;
            Handler handler;
            try
            {
                handler = Handler.Load(Env("_HANDLER", ""), Env("LAMBDA_TASK_ROOT", Directory.GetCurrentDirectory()));
            }
            catch (Exception e)
            {
                byte[] body = ErrorBody(e, out header);
                Flush();
                conn.Post(RuntimePath + "/init/error", body, header);
                return 1;
            }
            byte[] next = Encoding.ASCII.GetBytes("GET " + RuntimePath + "/invocation/next HTTP/1.1\r\nHost: " + conn.Host + "\r\n\r\n");
            while (true)
            {
                Response r = conn.Request(next);
                if (r.Status != 200)
                {
                    Log("impuls runtime: GET /invocation/next answered HTTP " + r.Status + ", exiting\n");
                    return 1;
                }
                string id, value;
                r.Headers.TryGetValue("Lambda-Runtime-Aws-Request-Id", out id);
                string path = RuntimePath + "/invocation/" + id;
                Environment.SetEnvironmentVariable("_X_AMZN_TRACE_ID",
                    r.Headers.TryGetValue("Lambda-Runtime-Trace-Id", out value) ? value : null);
                byte[] payload;
                try
                {
                    var context = new LambdaContext { AwsRequestId = id ?? "" };
                    long deadline;
                    if (r.Headers.TryGetValue("Lambda-Runtime-Deadline-Ms", out value) && long.TryParse(value, out deadline))
                        context.DeadlineMs = deadline;
                    context.InvokedFunctionArn = r.Headers.TryGetValue("Lambda-Runtime-Invoked-Function-Arn", out value) ? value : "";
                    if (r.Headers.TryGetValue("Lambda-Runtime-Client-Context", out value))
                        context.ClientContext = JsonConvert.DeserializeObject<ClientContext>(value);
                    if (r.Headers.TryGetValue("Lambda-Runtime-Cognito-Identity", out value))
                        context.Identity = JsonConvert.DeserializeObject<CognitoIdentity>(value);
                    payload = handler.Invoke(r.Body, context);
                }
                catch (Exception e)
                {
                    byte[] body = ErrorBody(e, out header);
                    Flush();
                    conn.Post(path + "/error", body, header);
                    continue;
                }
                Flush();
                conn.Post(path + "/response", payload, "");
            }
        }
    }
}
