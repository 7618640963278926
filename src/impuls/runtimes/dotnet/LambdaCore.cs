// Amazon.Lambda.Core for Impuls's dotnet-mono runtime: the interfaces and attributes of AWS's
// Amazon.Lambda.Core package (ILambdaContext, ILambdaLogger, LambdaLogger, ILambdaSerializer,
// LambdaSerializerAttribute) and the two serializer classes Lambda's templates name, so that
// simple Lambda C# code compiles unchanged with Mono's mcs.  Compiled at deploy into
// Amazon.Lambda.Core.dll next to the function's assembly; both serializers are Newtonsoft.Json
// (Debian's), as AWS's Amazon.Lambda.Serialization.Json is.

using System;
using System.Collections.Generic;
using System.IO;
using System.Text;

namespace Amazon.Lambda.Core
{
    public interface ILambdaLogger
    {
        void Log(string message);
        void LogLine(string message);
    }

    public interface ICognitoIdentity
    {
        string IdentityId { get; }
        string IdentityPoolId { get; }
    }

    public interface IClientApplication
    {
        string AppPackageName { get; }
        string AppTitle { get; }
        string AppVersionCode { get; }
        string AppVersionName { get; }
        string InstallationId { get; }
    }

    public interface IClientContext
    {
        IDictionary<string, string> Environment { get; }
        IClientApplication Client { get; }
        IDictionary<string, string> Custom { get; }
    }

    public interface ILambdaContext
    {
        string AwsRequestId { get; }
        IClientContext ClientContext { get; }
        string FunctionName { get; }
        string FunctionVersion { get; }
        ICognitoIdentity Identity { get; }
        string InvokedFunctionArn { get; }
        ILambdaLogger Logger { get; }
        string LogGroupName { get; }
        string LogStreamName { get; }
        int MemoryLimitInMB { get; }
        TimeSpan RemainingTime { get; }
    }

    /// <summary>Writes to the function's log (standard output), as Lambda's does.</summary>
    public static class LambdaLogger
    {
        public static void Log(string message)
        {
            Console.Out.Write(message);
            Console.Out.Flush();
        }
    }

    public interface ILambdaSerializer
    {
        T Deserialize<T>(Stream requestStream);
        void Serialize<T>(T response, Stream responseStream);
    }

    /// <summary>Names the serializer of an assembly or a handler method.</summary>
    [AttributeUsage(AttributeTargets.Assembly | AttributeTargets.Method, AllowMultiple = false)]
    public sealed class LambdaSerializerAttribute : Attribute
    {
        public LambdaSerializerAttribute(Type serializerType)
        {
            SerializerType = serializerType;
        }

        public Type SerializerType { get; set; }
    }
}

namespace Amazon.Lambda.Serialization.Json
{
    /// <summary>JSON by Newtonsoft.Json: property names as written, read case-insensitively.</summary>
    public class JsonSerializer : Amazon.Lambda.Core.ILambdaSerializer
    {
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);
        readonly Newtonsoft.Json.JsonSerializer serializer = Newtonsoft.Json.JsonSerializer.Create(
            new Newtonsoft.Json.JsonSerializerSettings { FloatParseHandling = Newtonsoft.Json.FloatParseHandling.Double });

        public T Deserialize<T>(Stream requestStream)
        {
            using (var reader = new StreamReader(requestStream, Utf8))
            using (var json = new Newtonsoft.Json.JsonTextReader(reader))
            {
                return serializer.Deserialize<T>(json);
            }
        }

        public void Serialize<T>(T response, Stream responseStream)
        {
            var writer = new StreamWriter(responseStream, Utf8);
            serializer.Serialize(writer, response, typeof(T));
            writer.Flush();
        }
    }
}

namespace Amazon.Lambda.Serialization.SystemTextJson
{
    /// <summary>The name Lambda's .NET templates use; on Mono it is the Newtonsoft.Json serializer.</summary>
    public class DefaultLambdaJsonSerializer : Amazon.Lambda.Serialization.Json.JsonSerializer
    {
    }
}
